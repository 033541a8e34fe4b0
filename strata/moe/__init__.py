"""Mixture-of-Experts: the routed-experts interface, expert cache, prefetch and placement."""
