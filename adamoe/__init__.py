"""Generic model surgery for Mixture-of-Experts policies (torch only)."""
