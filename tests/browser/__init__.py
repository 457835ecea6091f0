"""Browser tests of the queen's web page."""
