"""Reports of a stored run: the terminal summary and one self-contained HTML page."""
