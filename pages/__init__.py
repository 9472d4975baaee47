"""The Streamlit pages, run by st.navigation from app.py; a package so that lint-imports can check their imports."""
