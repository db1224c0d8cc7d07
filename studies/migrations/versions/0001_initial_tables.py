"""Initial tables: jobs, API keys, exports, evaluation cache.

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 04:49:57.675269

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('s3s_api_keys',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('salt', sa.String(length=64), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_s3s_api_keys'))
    )
    with op.batch_alter_table('s3s_api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_s3s_api_keys_owner'), ['owner'], unique=False)

    op.create_table('s3s_eval_cache',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('schedule_hash', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('metric_key', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('nfe', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('extras', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_s3s_eval_cache')),
    sa.UniqueConstraint('schedule_hash', 'model', 'metric_key', 'seed', name='uq_s3s_eval_cache_key')
    )
    op.create_table('s3s_jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('study_name', sa.String(length=64), nullable=False),
    sa.Column('optuna_study_id', sa.Integer(), nullable=True),
    sa.Column('budget', sa.Integer(), nullable=False),
    sa.Column('evaluations', sa.Integer(), nullable=False),
    sa.Column('best_value', sa.Float(), nullable=True),
    sa.Column('best_schedule', sa.JSON(), nullable=True),
    sa.Column('predictor_tau', sa.Float(), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('runner_id', sa.String(length=128), nullable=True),
    sa.Column('claim_token', sa.String(length=32), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_s3s_jobs')),
    sa.UniqueConstraint('owner', 'idempotency_key', name='uq_s3s_jobs_owner_idempotency_key')
    )
    with op.batch_alter_table('s3s_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_s3s_jobs_owner_created', ['owner', 'created_at'], unique=False)
        batch_op.create_index('ix_s3s_jobs_status_created', ['status', 'created_at'], unique=False)

    op.create_table('s3s_exports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=False),
    sa.Column('schedule_hash', sa.String(length=64), nullable=False),
    sa.Column('document', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['s3s_jobs.id'], name=op.f('fk_s3s_exports_job_id_s3s_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_s3s_exports')),
    sa.UniqueConstraint('job_id', 'format', 'schedule_hash', name='uq_s3s_exports_job_format_hash')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('s3s_exports')
    with op.batch_alter_table('s3s_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_s3s_jobs_status_created')
        batch_op.drop_index('ix_s3s_jobs_owner_created')

    op.drop_table('s3s_jobs')
    op.drop_table('s3s_eval_cache')
    with op.batch_alter_table('s3s_api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_s3s_api_keys_owner'))

    op.drop_table('s3s_api_keys')
