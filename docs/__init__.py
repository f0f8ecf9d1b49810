"""README.md's companions: design notes and measurements (Markdown), their table generator and the examples' recorder."""
