"""
Configuration: maddy's syntax (SPEC §2) parsed into the frozen tree of
L{smtprelay.config.model}.
"""
