-- airgate schema, version 1.
-- Money: integer fen (CNY/100) for balances, prices of plans and orders; integer
-- micro-CNY for token prices (per 1M tokens) and per-request cost.

CREATE TABLE users (
    id                  text PRIMARY KEY,              -- u_xxx
    email               text NOT NULL UNIQUE,          -- stored lower-cased
    password_hash       text NOT NULL,
    role                text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    plan                text,                          -- plan id, NULL when none
    token_limit         bigint NOT NULL DEFAULT 0,
    token_used          bigint NOT NULL DEFAULT 0,
    request_count       bigint NOT NULL DEFAULT 0,
    expires_at          timestamptz,                   -- plan expiry, NULL = never
    rpm                 integer,                       -- per-user requests/min, NULL = unlimited
    balance_fen         bigint NOT NULL DEFAULT 0 CHECK (balance_fen >= 0),
    rebate_fen          bigint NOT NULL DEFAULT 0 CHECK (rebate_fen >= 0),
    invite_code         text NOT NULL UNIQUE,
    invited_by          text REFERENCES users(id),
    sessions_valid_from timestamptz NOT NULL DEFAULT now(),  -- JWTs issued before are refused
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            text PRIMARY KEY,                    -- ak_xxx
    user_id       text NOT NULL REFERENCES users(id),
    key_hash      bytea NOT NULL UNIQUE,               -- sha256 of the full sk- key
    key_hint      text NOT NULL,                       -- sk-abcd...wxyz, for masked lists
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE upstream_keys (
    id              text PRIMARY KEY,                  -- uk_xxx
    name            text NOT NULL,
    base_url        text NOT NULL,
    api_key         text NOT NULL,                     -- the provider secret; never exported
    models          text[] NOT NULL DEFAULT '{}',
    model_map       jsonb NOT NULL DEFAULT '{}',
    weight          integer NOT NULL DEFAULT 1 CHECK (weight > 0),
    priority        integer NOT NULL DEFAULT 0,
    rpm             integer CHECK (rpm IS NULL OR rpm > 0),
    tpm             integer CHECK (tpm IS NULL OR tpm > 0),
    max_concurrency integer NOT NULL DEFAULT 16 CHECK (max_concurrency > 0),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id             text PRIMARY KEY,
    display_name   text NOT NULL,
    model_group    text NOT NULL DEFAULT '',
    owned_by       text NOT NULL DEFAULT '',
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    input_price    bigint NOT NULL DEFAULT 0,          -- micro-CNY per 1M tokens
    output_price   bigint NOT NULL DEFAULT 0,
    cached_price   bigint NOT NULL DEFAULT 0,
    tags           text[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    price_fen      bigint NOT NULL CHECK (price_fen >= 0),
    token_limit    bigint NOT NULL CHECK (token_limit >= 0),
    duration_days  integer NOT NULL CHECK (duration_days > 0),
    model_groups   text[] NOT NULL DEFAULT '{}',       -- empty = every group
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id              text PRIMARY KEY,                  -- ord_xxx
    user_id         text NOT NULL REFERENCES users(id),
    plan_id         text NOT NULL REFERENCES plans(id),
    amount_fen      bigint NOT NULL CHECK (amount_fen >= 0),
    payment_method  text NOT NULL CHECK (payment_method IN ('wxpay', 'balance')),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'paid', 'cancelled', 'expired')),
    code_url        text,
    transaction_id  text UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    paid_at         timestamptz
);
CREATE INDEX orders_user ON orders (user_id, created_at DESC);
CREATE INDEX orders_pending ON orders (expires_at) WHERE status = 'pending';

-- Append-only: every balance, rebate or quota change except per-request usage (which is
-- its own append-only table below, keyed by request id).
CREATE TABLE ledger (
    id               bigserial PRIMARY KEY,
    user_id          text NOT NULL REFERENCES users(id),
    kind             text NOT NULL,   -- payment, balance_payment, coupon, rebate, transfer, admin_adjust
    delta_balance_fen bigint NOT NULL DEFAULT 0,
    delta_rebate_fen  bigint NOT NULL DEFAULT 0,
    delta_tokens     bigint NOT NULL DEFAULT 0,
    idempotency_key  text NOT NULL UNIQUE,
    ref              text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_user ON ledger (user_id, id);

CREATE TABLE coupons (
    code        text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('tokens', 'balance', 'plan')),
    value       bigint NOT NULL DEFAULT 0,
    plan_id     text REFERENCES plans(id),
    max_uses    integer NOT NULL CHECK (max_uses > 0),
    used        integer NOT NULL DEFAULT 0 CHECK (used <= max_uses),
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE coupon_redemptions (
    code        text NOT NULL REFERENCES coupons(code),
    user_id     text NOT NULL REFERENCES users(id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, user_id)
);

CREATE TABLE usage_records (
    request_id        text PRIMARY KEY,
    user_id           text NOT NULL,
    api_key_id        text,
    upstream_key_id   text,
    model             text NOT NULL,
    endpoint          text NOT NULL,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    cached_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_micro        bigint NOT NULL DEFAULT 0,
    latency_ms        integer NOT NULL DEFAULT 0,
    ttft_ms           integer,
    status            integer NOT NULL,
    usage_source      text NOT NULL CHECK (usage_source IN ('upstream', 'estimate', 'none')),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_user_time ON usage_records (user_id, created_at DESC);

CREATE TABLE settings (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
