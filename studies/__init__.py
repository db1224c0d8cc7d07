"""Storage of the s3search service: jobs, API keys, exports and the evaluation cache, on SQLite or PostgreSQL,
with the Optuna storage on the same database."""
