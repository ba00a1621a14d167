"""Adapters to other training frameworks (torchft, …): optional extras, imported lazily."""
