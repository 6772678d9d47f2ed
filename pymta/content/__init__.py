"""Content filtering, the amavis part: scanner clients (clamd, spamd, rspamd) and message
inspections (banned files, bad headers). The pipeline stages, destinies and quarantine that use
them come next.
"""
