"""Conversations: prompts from the model's chat template, turns, the context window, history."""
