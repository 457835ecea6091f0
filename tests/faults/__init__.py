"""The fault tier: real processes, killed, stopped, slowed; the documented state, nothing left behind."""
