"""Training objectives over packed rows: the preference losses live in `llmft.objectives.preference`."""
