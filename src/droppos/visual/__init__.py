"""Pictures of what a model does: the jigsaw DropPos solves."""
