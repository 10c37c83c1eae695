//! The library face (SPEC §10): `Client` and the `admin` functions.
