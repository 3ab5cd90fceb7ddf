"""What a run reports: its counts, the run report and progress line, the HTML page."""
