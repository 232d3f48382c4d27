"""Data tools: reading corpora (text, directories, JSONL, Parquet) with file:line errors."""
