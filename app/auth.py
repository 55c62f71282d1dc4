"""The access check every page passes before it renders.

The dashboard starts processes, so whoever reaches it can run code as its user. Bound to a loopback
address it needs no token (only local users reach it); bound anywhere else it must have one, and a
session must present it once, as `?token=...` in the address or in the form below; it is then
remembered in the session (server-side) and removed from the address bar. Comparison is
constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac

import streamlit as st

from app import settings

_KEY = "_vitrine_authorized"


def _matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def gate() -> bool:
    """True when this session may see the dashboard; otherwise renders why (or a token form)."""
    token = settings.token()
    address = st.get_option("server.address")
    if token is None:
        if settings.is_loopback(address):
            return True
        st.error(f"This dashboard is listening on {address or 'every interface'} without an access token, "
                 f"so it shows nothing. Set {settings.TOKEN_ENV} (or start it with `vitrine dashboard --token ...`), "
                 f"or bind it to 127.0.0.1.")
        return False
    if st.session_state.get(_KEY):
        return True
    given = st.query_params.get("token")
    if given is not None:
        if _matches(given, token):
            st.session_state[_KEY] = True
            del st.query_params["token"]
            return True
        st.error("The token in the address is wrong.")
    st.title("Vitrine")
    with st.form("token-form"):
        typed = st.text_input("Access token", type="password", help="the token the dashboard was started with")
        if st.form_submit_button("Open"):
            if _matches(typed, token):
                st.session_state[_KEY] = True
                st.rerun()
            st.error("Wrong token.")
    return False


def require() -> None:
    """First line of every view: stop here unless the session passed the gate (the entry point
    already checks; this keeps a view safe if it is ever run some other way)."""
    if not gate():
        st.stop()
