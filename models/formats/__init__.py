"""One module per weight format; models/weights.py is the door that picks one."""
