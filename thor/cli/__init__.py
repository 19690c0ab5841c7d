"""Command line programs that are not daemons."""
