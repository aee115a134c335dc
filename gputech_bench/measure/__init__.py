"""Memory and time measurements. Every figure carries its unit and method in the result."""
