"""The `droppos` command line."""
