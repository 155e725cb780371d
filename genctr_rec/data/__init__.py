"""The public dataset format: schemas, writers, dataset recipes, validation and readers."""
