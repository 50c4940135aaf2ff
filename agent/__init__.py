"""devpass agent."""
