"""Rendering helpers shared by the Streamlit pages: formatting, the signed-in actor, filters.

Like pages/, this package only renders and calls services; it never imports db models or connectors.
"""
