"""Atelier's browser front end. Imports only `engine.config` and event types from the engine, never torch."""
