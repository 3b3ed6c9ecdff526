"""The shared core (floor 2): settings and the model registry, used by the flows, the
agent server and the `valifi` command alike. Imports `model` and libraries only."""
