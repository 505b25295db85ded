"""Live membership: routes added, removed and discovered while the router serves."""
