-- Token quota leased to gateway processes, so that several processes (or instances) on
-- one database never grant more than a user's remaining quota in total. A process spends
-- its lease in memory; each usage flush moves the spent tokens from the lease into
-- users.token_used. Leases not renewed for a while (a crashed process) stop counting.
CREATE TABLE quota_leases (
    user_id     text NOT NULL REFERENCES users(id),
    holder      text NOT NULL,
    tokens      bigint NOT NULL CHECK (tokens >= 0),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, holder)
);
CREATE INDEX quota_leases_holder ON quota_leases (holder);
