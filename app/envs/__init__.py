"""Environment factories and scripted experts used for demonstrations and evaluation."""
