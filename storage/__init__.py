"""Files and the SQLite queue: the only things the node's stages share."""
