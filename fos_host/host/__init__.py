"""The host proper: tabs and their tiers, sites and locks, lifecycle policy, control API."""
