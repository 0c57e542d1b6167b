"""Workers sharing the connections: the running ``threadsync run`` processes
with their heartbeat, and the lease each holds on a connection.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('connection_leases',
    sa.Column('connection_id', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=255), nullable=False),
    sa.Column('lease_until', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(
        ['connection_id'], ['connections.id'],
        name=op.f('fk_connection_leases_connection_id_connections'), ondelete='CASCADE',
    ),
    sa.PrimaryKeyConstraint('connection_id', name=op.f('pk_connection_leases'))
    )
    with op.batch_alter_table('connection_leases', schema=None) as batch_op:
        batch_op.create_index('ix_connection_lease_worker', ['worker_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('connection_leases', schema=None) as batch_op:
        batch_op.drop_index('ix_connection_lease_worker')
    op.drop_table('connection_leases')
    op.drop_table('workers')
