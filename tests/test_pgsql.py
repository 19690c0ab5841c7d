"""Connections to PostgreSQL as NGNPro and thor-dns make them: TLS, the server's certificate
checked against the provider CA for the address connected to (sslmode=verify-full)."""

import psycopg2
import psycopg2.extensions
import pytest

from thor.loopback.pki import ScratchPKI
from thor.loopback.postgresql import PostgreSQL
from thor.pgsql import connect, make_dsn


@pytest.fixture(scope="module")
def postgresql():
    database = PostgreSQL()
    yield database
    database.remove()


def dsn(postgresql, host="127.0.0.1", sslmode="verify-full", sslrootcert=None, password=""):
    return make_dsn(host, postgresql.port, "postgres", "postgres", password, sslmode, sslrootcert or postgresql.ca)


def test_verify_full_connects_over_tls_to_the_certificate_of_the_address(postgresql):
    connection = connect(dsn(postgresql))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            encrypted, version = cursor.fetchone()
    finally:
        connection.close()
    assert encrypted is True and version in ("TLSv1.2", "TLSv1.3")


def test_a_server_certificate_of_another_ca_is_refused(postgresql, tmp_path):
    """What a man in the middle with a certificate of his own meets."""
    other_ca = ScratchPKI(tmp_path / "other").files("anyone", roles="thor_database")["ca"]
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
        connect(dsn(postgresql, sslrootcert=other_ca))


def test_a_server_certificate_for_another_name_is_refused(postgresql):
    """The certificate is for 127.0.0.1 (and the name "database"): reached as localhost, it is not
    the server asked for."""
    with pytest.raises(psycopg2.OperationalError, match="does not match host name"):
        connect(dsn(postgresql, host="localhost"))


def test_a_password_with_spaces_and_quotes_stays_one_field():
    text = make_dsn("192.0.2.1", 5432, "thor", "thor", "it's a pass word", "verify-full", "/etc/thor/tls/ca.crt")
    assert psycopg2.extensions.parse_dsn(text) == {
        "host": "192.0.2.1",
        "port": "5432",
        "dbname": "thor",
        "user": "thor",
        "password": "it's a pass word",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/thor/tls/ca.crt",
    }
