"""
Where objects are wired: the service, the twistd plugin, the configuration check.
"""
