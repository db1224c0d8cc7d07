"""Suite-wide settings. Tests put their path in sys.path so helper modules like gaussian_bed import directly."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Cached reference statistics go to a fresh folder per test session: a developer's ~/.cache (from another
# version of a model) must neither be used nor be refused as stale inside the suite.
os.environ.setdefault("S3SEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="s3search-test-cache-"))
