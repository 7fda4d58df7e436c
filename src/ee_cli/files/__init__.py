"""What ee writes and reads back: the bundle (ee.json, model.h5, the exit evidence) and the JSON Schemas
of ee.json and manifest.json. Imports base, graph and exits."""
