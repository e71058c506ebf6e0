"""spark-det."""
