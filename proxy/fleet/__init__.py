"""What crosses processes: invalidations to every worker and replica, the group's numbers."""
