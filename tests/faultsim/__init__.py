"""The model-based fault search's parts: a fault-injecting engine world and condo's lifecycle."""
