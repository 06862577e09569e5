"""The console's screens, one module each; ``base`` holds the contract they keep with the app.

Owns: nothing but the package. Never: imports ``tui.app``.
"""
