"""The connector API: the two ABCs and their plain data types."""
