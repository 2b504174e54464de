"""Shared fixtures: tiny shapes so the suite stays fast on 2 CPU cores."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
