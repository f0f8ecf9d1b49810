"""README.md's companions: design notes and measurements, their table generator, the examples' recorder."""
