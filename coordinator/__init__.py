"""Coordinator: registry of providers, pipeline planner, request router, consumer API."""
