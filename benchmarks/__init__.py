"""`make bench`: each benchmark measures us and the reference system in the same run and prints ratios."""
