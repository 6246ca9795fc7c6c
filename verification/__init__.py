"""Audits by redundant re-execution, tolerant comparison, disputes and reputation."""
