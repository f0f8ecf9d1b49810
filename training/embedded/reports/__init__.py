"""Report scripts of the embedded models: summaries and tables read from the committed reports."""
