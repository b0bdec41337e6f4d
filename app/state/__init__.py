"""State: JSON values kept per agent and organization, versioned for compare-and-set writes."""
