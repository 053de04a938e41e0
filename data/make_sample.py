"""Write glmtune's bundled sample data: synthetic ADGEN-style ad copy and a small multi-turn chat set.

The rows imitate the *format* of ADGEN (AdvertiseGen, used by the official ChatGLM2 P-tuning example):
`content` is a `key#value*key#value` attribute string and `summary` a Chinese ad sentence. Every word
here comes from the small vocabularies below, written for this project; nothing is copied from ADGEN.
Each attribute value maps to a fixed phrase, so a tiny model can learn the mapping in minutes on a CPU.

    python data/make_sample.py            # rewrites data/adgen_sample/{train,dev}.json, data/multiturn_sample.json
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

SEED = 20240601
N_TRAIN, N_DEV, N_MULTITURN = 600, 100, 100
SUMMARY_CHARS = (30, 90)

# Shared attributes: key -> {value: phrase used in the ad sentence}.
COMMON = {
    "版型": {
        "宽松": "宽松的版型不挑身材",
        "显瘦": "显瘦的剪裁拉长身形",
        "修身": "修身的版型贴合曲线",
        "直筒": "直筒的廓形利落大方",
    },
    "材质": {
        "棉": "纯棉面料柔软透气",
        "牛仔布": "牛仔面料耐磨有型",
        "雪纺": "雪纺面料轻盈飘逸",
        "针织": "针织面料亲肤有弹性",
        "蕾丝": "蕾丝面料精致浪漫",
        "真丝": "真丝面料顺滑有光泽",
    },
    "颜色": {
        "白色": "干净的白色清爽耐看",
        "黑色": "经典的黑色沉稳百搭",
        "红色": "热烈的红色衬托好气色",
        "蓝色": "清透的蓝色带来凉意",
        "粉色": "温柔的粉色甜美减龄",
        "卡其色": "低调的卡其色自然随和",
    },
    "风格": {
        "简约": "简约的设计低调耐看",
        "性感": "性感的细节撩人心动",
        "复古": "复古的韵味别有腔调",
        "休闲": "休闲的气息轻松自在",
        "清新": "清新的感觉扑面而来",
        "甜美": "甜美的气质俏皮可爱",
        "通勤": "通勤的格调干练大方",
    },
    "图案": {
        "条纹": "条纹图案富有节奏感",
        "格子": "格子图案学院味十足",
        "印花": "印花图案吸睛又灵动",
        "刺绣": "刺绣图案精巧有质感",
        "碎花": "碎花图案浪漫满分",
        "线条": "流畅的线条勾勒身形",
    },
}

# Type-specific attributes; the first key names the item itself ("阔腿裤", "连衣裙", "衬衫").
BY_TYPE = {
    "裤": {
        "裤型": {
            "阔腿裤": "阔腿的裤型走路带风",
            "直筒裤": "直筒的裤管修饰腿型",
            "哈伦裤": "哈伦的裤型舒适随性",
            "铅笔裤": "铅笔的裤型紧致利落",
        },
        "裤长": {
            "九分裤": "九分的长度露出脚踝",
            "七分裤": "七分的长度清爽灵动",
            "短裤": "短款的长度活力满满",
        },
        "裤腰型": {
            "高腰": "高腰设计提升腰线",
            "松紧腰": "松紧腰头穿脱方便",
        },
        "裤款式": {
            "破洞": "破洞细节彰显个性",
            "口袋": "实用的口袋方便收纳",
            "抽绳": "抽绳设计自由调节",
        },
    },
    "裙": {
        "裙型": {
            "a字裙": "a字的裙摆遮肉显瘦",
            "百褶裙": "百褶的裙摆灵动飘逸",
            "鱼尾裙": "鱼尾的裙摆优雅迷人",
            "包臀裙": "包臀的裙型勾勒曲线",
        },
        "裙长": {
            "连衣裙": "连衣裙的款式一件成型",
            "半身裙": "半身裙的款式搭配灵活",
            "长裙": "长裙的长度温柔知性",
        },
        "裙领型": {
            "v领": "v领设计修饰脸型",
            "圆领": "圆领设计乖巧舒适",
            "一字领": "一字领露出精致锁骨",
        },
        "裙款式": {
            "收腰": "收腰设计凸显纤细腰身",
            "荷叶边": "荷叶边点缀增添层次",
            "系带": "系带细节俏皮灵动",
        },
    },
    "上衣": {
        "衣样式": {
            "衬衫": "衬衫的样式干净利落",
            "卫衣": "卫衣的样式休闲舒适",
            "外套": "外套的样式挡风保暖",
            "毛衣": "毛衣的样式温暖柔软",
        },
        "衣长": {
            "短款": "短款的衣长拉高比例",
            "中长款": "中长款的衣长遮住臀部",
        },
        "衣领型": {
            "翻领": "翻领设计精神挺括",
            "立领": "立领设计护住脖颈",
            "连帽": "连帽设计减龄有趣",
        },
        "衣袖型": {
            "灯笼袖": "灯笼袖型遮住手臂",
            "落肩袖": "落肩袖型慵懒随性",
        },
        "衣款式": {
            "纽扣": "纽扣门襟开合方便",
            "拼接": "拼接设计丰富层次",
            "口袋": "口袋设计实用又美观",
        },
    },
}

GENERIC_ITEM = {"裤": "裤子", "裙": "裙子", "上衣": "上衣"}
MEASURE_WORD = {"裤": "条", "裙": "条", "上衣": "件"}
OPENERS = ("这款{item}", "推荐这{mw}{item}", "这{mw}{item}")
CLOSINGS = {
    "简约": "日常穿搭轻松不出错",
    "性感": "约会穿上魅力十足",
    "复古": "出街穿上回头率超高",
    "休闲": "周末出游舒适又好看",
    "清新": "夏日穿上清爽宜人",
    "甜美": "少女感满满",
    "通勤": "上班通勤得体大方",
}
DEFAULT_CLOSING = "实穿又好搭"

FOLLOW_UPS = {
    "有其他颜色吗？": lambda a, r: "这款还有{}和{}可以选，都很百搭。".format(*r.sample(list(COMMON["颜色"]), 2)),
    "适合什么场合穿？": lambda a, r: "{}，{}。".format(
        COMMON["风格"][a["风格"]] if "风格" in a else "款式百搭", CLOSINGS.get(a.get("风格"), DEFAULT_CLOSING)
    ),
    "怎么搭配比较好？": lambda a, r: {
        "裤": "上身搭配简单的t恤或衬衫，再配一双小白鞋就很好看。",
        "裙": "搭配一件短款外套和一双单鞋，温柔又有气质。",
        "上衣": "下身搭配直筒裤或半身裙，都能穿出好比例。",
    }[a["类型"]],
    "面料怎么样？": lambda a, r: (COMMON["材质"][a["材质"]] if "材质" in a else "面料柔软舒适") + "，穿着很舒服。",
}


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """One item: its type, 1-3 shared attributes, and 2-3 type-specific ones (the first always present)."""
    kind = rng.choice(list(BY_TYPE))
    attrs = {"类型": kind}
    for key in sorted(rng.sample(list(COMMON), rng.randint(1, 3)), key=list(COMMON).index):
        attrs[key] = rng.choice(list(COMMON[key]))
    specific = list(BY_TYPE[kind])
    chosen = [specific[0], *rng.sample(specific[1:], rng.randint(1, 2))]
    for key in sorted(chosen, key=specific.index):
        attrs[key] = rng.choice(list(BY_TYPE[kind][key]))
    return attrs


def content_of(attrs: dict[str, str]) -> str:
    return "*".join(f"{k}#{v}" for k, v in attrs.items())


def summary_of(attrs: dict[str, str], rng: random.Random) -> str:
    """Opener naming the item, one fixed phrase per attribute in content order, a style-keyed closing."""
    kind = attrs["类型"]
    phrases = {**COMMON, **BY_TYPE[kind]}
    item_key = next(iter(BY_TYPE[kind]))
    item = attrs.get(item_key, GENERIC_ITEM[kind])
    parts = [rng.choice(OPENERS).format(item=item, mw=MEASURE_WORD[kind])]
    parts += [phrases[k][v] for k, v in attrs.items() if k != "类型"]
    parts.append(CLOSINGS.get(attrs.get("风格"), DEFAULT_CLOSING))
    return "，".join(parts) + "。"


def adgen_rows(rng: random.Random, n: int) -> list[tuple[dict[str, str], dict[str, str]]]:
    """`n` items with distinct contents (so dev never repeats a train prompt) and summaries in range."""
    rows, seen = [], set()
    while len(rows) < n:
        attrs = sample_attributes(rng)
        content, summary = content_of(attrs), summary_of(attrs, rng)
        if content not in seen and SUMMARY_CHARS[0] <= len(summary) <= SUMMARY_CHARS[1]:
            seen.add(content)
            rows.append((attrs, {"content": content, "summary": summary}))
    return rows


def multiturn_rows(rng: random.Random, n: int) -> list[dict]:
    """A first round `content -> summary`, then 0-2 follow-up questions about the same item."""
    rows = []
    for attrs, row in adgen_rows(rng, n):
        turns = [(row["content"], row["summary"])]
        for question in rng.sample(list(FOLLOW_UPS), rng.randint(0, 2)):
            turns.append((question, FOLLOW_UPS[question](attrs, rng)))
        *history, (prompt, response) = turns
        rows.append({"prompt": prompt, "response": response, "history": [list(t) for t in history]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(out_dir: Path = Path(__file__).resolve().parent) -> None:
    rng = random.Random(SEED)
    adgen = [row for _, row in adgen_rows(rng, N_TRAIN + N_DEV)]
    write_jsonl(out_dir / "adgen_sample" / "train.json", adgen[:N_TRAIN])
    write_jsonl(out_dir / "adgen_sample" / "dev.json", adgen[N_TRAIN:])
    write_jsonl(out_dir / "multiturn_sample.json", multiturn_rows(rng, N_MULTITURN))
    print(f"wrote {N_TRAIN} train, {N_DEV} dev, {N_MULTITURN} multi-turn rows under {out_dir}")


if __name__ == "__main__":
    main()
