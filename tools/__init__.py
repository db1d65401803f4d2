"""Commands around the algorithms: make this project's datasets (make_dataset, door_human), and use a
trained run (evaluate; agent: load_agent). They use the algorithms; common/ never does."""
