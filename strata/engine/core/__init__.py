"""The engine loop shared by the in-process engine thread and the engine process."""
