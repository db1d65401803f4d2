"""Commands that make this project's datasets (they use the algorithms; common/ never does)."""
