-- Default catalogue and plans. Prices: models in micro-CNY per 1M tokens, plans in fen.
INSERT INTO models (id, display_name, model_group, owned_by, input_price, output_price,
                    cached_price, tags) VALUES
    ('deepseek-v4-flash', 'DeepSeek V4 Flash', 'DeepSeek', 'deepseek', 500000, 2000000, 250000,
     '{DeepSeek}'),
    ('gpt-4o-mini', 'GPT-4o mini', 'OpenAI', 'openai', 1050000, 4200000, 525000, '{OpenAI}'),
    ('text-embedding-3-small', 'Text Embedding 3 Small', 'OpenAI', 'openai', 140000, 0, 0,
     '{OpenAI,embedding}')
ON CONFLICT (id) DO NOTHING;

INSERT INTO plans (id, name, price_fen, token_limit, duration_days, model_groups) VALUES
    ('starter_monthly', 'Starter (monthly)', 2900, 5000000, 30, '{}'),
    ('pro_monthly', 'Pro (monthly)', 9900, 30000000, 30, '{}'),
    ('deepseek_monthly', 'DeepSeek only (monthly)', 1900, 10000000, 30, '{DeepSeek}')
ON CONFLICT (id) DO NOTHING;
